"""Grafana dashboards as code (grafana-foundation-sdk), their build and push, a Grafana
PostgreSQL macro expander for proving their SQL without Grafana, and the HTML impact report."""
