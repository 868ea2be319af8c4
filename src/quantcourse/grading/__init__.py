"""Grading: nbgrader release, autograde, feedback and self-check for the course's assignments."""
