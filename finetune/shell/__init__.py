"""Effects: files, tokenizers, hub, console, the train loop."""
