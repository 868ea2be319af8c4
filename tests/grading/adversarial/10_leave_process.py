# ruff: noqa: E501 - the submissions are code in strings
"""Leave processes behind (a double-forked daemon and a subprocess) that would touch later gradings."""

from . import HONEST_FAKE_QUANT, HONEST_SCALE

EARNED = 5.0
ANSWERS = {"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}
EXTRA = [
    "import os, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)  # {MARK}'], start_new_session=True)\n"
    "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        for _ in range(600):\n            time.sleep(1)\n"
    "            try:\n                open('{ROOT}/{MARK}', 'w').write('left behind')\n            except OSError:\n                pass\n"
    "    os._exit(0)\n"
    "os.wait()\n"
]
