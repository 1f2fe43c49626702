"""`ft serve`: an OpenAI-compatible HTTP server on one base model and its LoRA adapters.

`protocol` decodes requests and builds OpenAI's response shapes, `engines` holds a model of either
engine with adapters swapped per request, `worker` runs every request on the one thread that owns
the model, `app` is the Starlette application, `server` runs it under uvicorn.
"""
