"""Loading a bundle: trust, verification, placement, the sealed executables, the tokenizer, the compile guard."""
