"""The lab: data, models, training, a run store, statistics and reports."""
