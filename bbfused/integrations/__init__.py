"""Glue for training frameworks, one module per client: ``lightning``, ``huggingface`` and ``timm``.

Each module imports its client on import; install them with ``pip install "bbfused[integrations]"``.
"""
