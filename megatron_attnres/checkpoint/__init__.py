"""The on-disk checkpoint format shared by the trainer and the converters (format.py) and the files
of a save directory (files.py).
"""
