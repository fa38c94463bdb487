"""The study (no torch): which runs make a study, running them, and the summary and figures of their results."""
