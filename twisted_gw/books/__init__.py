"""
The books: what finished requests cost, per user and in all, over rolling
windows, in the ledger that survives restarts, in C{/metrics} and Prometheus,
and in the usage report.
"""
