"""lmforge: a GPT-style language model built from scratch, run on Ray."""
