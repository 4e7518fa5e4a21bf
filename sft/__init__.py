"""Supervised fine-tuning on TRL's SFTTrainer.

Not implemented yet: tracked in issue 4 (the README's status table says so).
"""
