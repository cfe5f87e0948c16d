"""The science check: D-OPSD vs SFT measured in a small world (see run_science.py)."""
