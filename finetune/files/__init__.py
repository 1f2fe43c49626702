"""Engine-free files below both engines: atomic writes, the checked weight reader, `.bin` without code, tokenizers."""
