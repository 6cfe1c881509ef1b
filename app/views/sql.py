"""SQL: read-only queries on the storage, with example queries and a CSV download.

Nothing typed here can change data: SQLite is opened with mode=ro (and query_only),
PostgreSQL runs every query in a read-only session, in a READ ONLY transaction with a
statement timeout, one statement at a time (the extended query protocol takes one), and
the transaction is always rolled back. The SQL runs as typed (`%` is no placeholder)."""
from __future__ import annotations

import streamlit as st

from app import common, data

DEFAULT_ROW_LIMIT = 1000
TIMEOUT_SECONDS = 10.0


def _load_example() -> None:
    choice = st.session_state.get("sql_example")
    if choice in data.EXAMPLE_QUERIES:
        st.session_state["sql_text"] = data.EXAMPLE_QUERIES[choice]


def render() -> None:
    st.title("SQL")
    st.caption(f"Read-only connection to `{common.redact(common.url())}`: one statement at a "
               f"time, at most {TIMEOUT_SECONDS:g} s; writes are refused by the database. "
               "Tables: bl_campaigns, bl_cells, bl_trials, bl_measurements, bl_workers, "
               "view bl_cell_results (docs/sql.md).")
    if "sql_text" not in st.session_state:
        st.session_state["sql_text"] = next(iter(data.EXAMPLE_QUERIES.values()))
    st.selectbox("Example queries", list(data.EXAMPLE_QUERIES), index=None,
                 placeholder="load an example…", key="sql_example", on_change=_load_example)
    st.text_area("Query", key="sql_text", height=160)
    controls = st.columns([1, 1, 4])
    row_limit = controls[0].number_input("Row limit", min_value=1, max_value=100_000,
                                         value=DEFAULT_ROW_LIMIT, key="sql_row_limit")
    run = controls[1].button("Run query", type="primary", key="run_sql")
    if not run:
        return
    try:
        result = data.run_read_only_query(common.engine(), st.session_state["sql_text"],
                                          row_limit=int(row_limit),
                                          timeout_seconds=TIMEOUT_SECONDS)
    except data.QueryError as exc:
        st.error(f"Query failed: {exc}")
        return
    note = f"{len(result.frame)} rows in {result.seconds:.2f} s"
    if result.truncated:
        note += f" (truncated at the row limit of {int(row_limit)})"
    st.caption(note)
    common.table(result.frame, key="sql_result", file_name="query.csv")


if __name__ == "__main__":
    render()
