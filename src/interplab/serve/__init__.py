"""`interplab serve`: an OpenAI-compatible server with per-request steering and a web workbench.

Nothing here is imported by `import interplab`; the server's modules import fastapi and torch
only when they are used (`interplab.serve.app.create_app`).
"""
