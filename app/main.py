"""batchlab dashboard: `batchlab dashboard [--storage URL]` or
`BATCHLAB_STORAGE=URL streamlit run app/main.py`.

A multipage app (st.navigation) that reads through `db/`, `study.results`,
`study.analysis` and `study.figures` (never torch) on a read-only engine, so nothing here
can change the data the workers write. Pages live in app/views/, not app/pages/: a
pages/ folder switches Streamlit to its older folder-based navigation, where opening
/scaling runs that file alone, without this script's navigation and sidebar.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path; the packages live one level up.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import common  # noqa: E402

PAGES = [  # (file under app/views, title, icon)
    ("campaigns.py", "Campaigns", ":material/monitoring:"),
    ("scaling.py", "Scaling", ":material/show_chart:"),
    ("hparams.py", "Hyperparameters", ":material/tune:"),
    ("curves.py", "Learning curves", ":material/timeline:"),
    ("budgets.py", "Budgets", ":material/savings:"),
    ("dynamics.py", "Dynamics", ":material/insights:"),
    ("sql.py", "SQL", ":material/database:"),
]


def main() -> None:
    st.set_page_config(page_title="batchlab", layout="wide")
    pages = [st.Page(f"views/{file}", title=title, icon=icon, default=(file == "campaigns.py"))
             for file, title, icon in PAGES]
    page = st.navigation(pages)
    if not common.schema_ready():
        return
    common.sidebar()
    page.run()


if __name__ == "__main__":
    main()
