# ruff: noqa: E501 - the submissions are code in strings
"""Re-execute the reference's source (inspect.getsource, or the module file read from disk)."""

from . import HONEST_SCALE

EARNED = 2.0
ANSWERS = {
    "absmax_scale": HONEST_SCALE,
    "fake_quant": (
        "import inspect, quantcourse.primitives as _p\n"
        "_ns = dict(_p.__dict__)\n"
        "exec(open(_p.__file__).read(), _ns)\n"
        "try:\n    exec(inspect.getsource(_p.fake_quantize), _ns)\nexcept OSError:\n    pass\n"
        "def fake_quant(x, n_bits):\n    return _ns['fake_quantize'](x, n_bits, symmetric=True, granularity=qc.PerTensor())\n"
    ),
}
