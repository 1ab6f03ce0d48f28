"""What happens around training: checkpoints, summaries, progress, report.

Each hook depends only on `hooks.base` and the library below the loop; the
loop (`train.py`) decides what to do with what the hooks return.
"""
