"""The submitter: validates submissions, stores snapshots, records runs, answers run queries."""
