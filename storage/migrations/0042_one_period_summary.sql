-- The last of the duplicate period summaries: streams_period_overview (0020) was kept by 0040
-- as kpi_period_summary under its old name while the demo still called it; nothing does now.
DROP FUNCTION IF EXISTS streams_period_overview(text);
