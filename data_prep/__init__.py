"""Raw text to a tokenizer (a trained SentencePiece model, or the user's own) and sharded
Arrow token files with a manifest.

Run ``python -m data_prep --help``. The on-disk format is described in ``manifest.py``
and in the README; :func:`data_prep.manifest.load_manifest` is the reader the trainer uses.
"""

FORMAT_VERSION = 1
