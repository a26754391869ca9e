"""The project's own Alpaca-format data set, generated offline and deterministically from facts.

alpaca-cleaned can't be downloaded in the offline profile, so the default data source is built here: from the
ISO tables in pycountry and the element data in periodictable (both pinned in requirements.txt), plus a few small
hand-checked tables where those packages say nothing (tables.py). Every answer is therefore checkable, the short
answers suit exact-match scoring, and the rows carry the same four task types the evaluation reports on.

Determinism: the same code and package versions give the same list, byte for byte, on any machine: data is iterated
in sorted order, all choices come from one seeded `random.Random`, and nothing depends on set or dict-hash order.

Modules: tables (hand-written facts), facts (loaded facts), questions (one table of asks per kind of subject),
rows (the row and seeded sampling), one module per task type (factual, closed_qa, classification, open_ended), and
dataset (the set, its contract check and writer; `python -m alpaca_qlora.data.bundled OUT.json`).
"""
from alpaca_qlora.data.bundled.dataset import BUNDLED_VERSION, generate_rows, write_rows

__all__ = ["BUNDLED_VERSION", "generate_rows", "write_rows"]
