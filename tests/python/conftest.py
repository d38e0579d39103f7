import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
# The benchmarks' models and data readers (models, datasets, data) live next to the DDP benchmark scripts.
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "ddp"))
