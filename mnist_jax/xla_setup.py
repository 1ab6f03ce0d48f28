"""PROVISIONAL: helper-1 replaces this file with the measured XLA flags."""


def configure(platform_hint=None):
  del platform_hint
