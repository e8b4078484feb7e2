"""Reports: the run report (figures + HTML) and model inspection."""
