"""Formats and file primitives, importing nothing else of the project.

- :mod:`trainer.io.atomic`   atomic writes (temp file + fsync + rename)
- :mod:`trainer.io.images`   the one image decoder (simplejpeg, Pillow)
- :mod:`trainer.io.binfile`  insightface verification ``.bin`` (restricted unpickler)

RecordIO and the insightface face-rec layout live in :mod:`trainer.data.recordio`
and :mod:`trainer.data.face_rec`; the checkpoint layout in :mod:`trainer.checkpoint`
(docs/design.md, docs/architecture.md).
"""
