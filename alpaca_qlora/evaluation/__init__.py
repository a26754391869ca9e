"""The evaluation job: answers scored per row, metrics overall and per task type, paired significance, the report,
and the comparison of two revisions. Import from the modules; this file stays empty so a stage's deps are the
modules it uses."""
