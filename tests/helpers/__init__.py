"""Helper modules the tests share (tests/ is on sys.path: `from helpers.tiny import make_adapter`).
No test module imports another; what two need lives here."""
