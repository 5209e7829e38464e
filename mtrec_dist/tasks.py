"""Task names, defined once for the config defaults, the data, the models and the trainers
(docs/design.md §3 Models contract).

``main`` (the click NCE) is always on; the others are switched in ``model.tasks``. The per-news
auxiliary tasks (MTRec §2.3) read labels of the news table, so the batch carries one column
per task in :data:`NEWS_TASKS` order (``Batch.news_valid``, ``Batch.aux_weight``); a column is
addressed by name through :data:`NEWS_COLUMN`, never by position.
"""

from __future__ import annotations

MAIN = "main"  # click prediction, NCE (MTRec eq. 3)
CATEGORY = "category"  # news category classification (MTRec eq. 5-6)
NER = "ner"  # B/I/O tagging of the title's entities (MTRec eq. 7-8)
SENTIMENT = "sentiment"  # news sentiment classification (EBNeRD poster)
DISAGREEMENT = "disagreement"  # MINER's interest disagreement regulariser (MINER §3.3, eq. 3)

NEWS_TASKS = (CATEGORY, NER, SENTIMENT)  # per-news auxiliary tasks, in column order
NEWS_COLUMN = {task: i for i, task in enumerate(NEWS_TASKS)}  # task -> its batch column
SWITCHABLE_TASKS = (*NEWS_TASKS, DISAGREEMENT)  # keys of model.tasks; main is always on
ALL_TASKS = (MAIN, *SWITCHABLE_TASKS)  # every task a gradient group may name
