"""Thin Prefect tasks around defectflow's logic: each calls src/defectflow and reports to the UI."""
