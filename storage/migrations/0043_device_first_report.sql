-- A status for the devices already reporting. The streams worker now reports a device online
-- at its first reading ("first report", streams.engine.advance), so "online" means one thing
-- everywhere: the last row of device_status (device_last_status, the City Lab overview, the
-- portal). Before, it stored going offline and coming back only, and a device that never fell
-- silent had no row: the overview counted it as "no status yet" while the portal called it
-- online. This gives each device that has readings of its experiment and no status row its
-- first report at its oldest such reading (last_seen: that reading too). Devices with any
-- status row keep theirs.
--
-- The oldest reading is found with index probes, not by reading a device's rows: readings'
-- key is (device_id, metric, ts), so the device's metrics are listed by a skip scan (the
-- smallest metric, then the smallest greater one, ...) and each (device, metric) gives its
-- oldest ts from the front of its index range. Devices × metrics probes, whatever the table's
-- size. Deploy the new streams worker before running it: a device the old worker sees for the
-- first time after this ran would otherwise get no first report (until it goes offline).
WITH RECURSIVE todo AS (
    SELECT d.device_id, d.experiment_id
      FROM devices d
     WHERE NOT EXISTS (SELECT 1 FROM device_status s WHERE s.device_id = d.device_id)
), metrics AS (
    SELECT t.device_id, t.experiment_id,
           (SELECT min(r.metric) FROM readings r WHERE r.device_id = t.device_id) AS metric
      FROM todo t
    UNION ALL
    SELECT m.device_id, m.experiment_id,
           (SELECT min(r.metric) FROM readings r WHERE r.device_id = m.device_id AND r.metric > m.metric)
      FROM metrics m
     WHERE m.metric IS NOT NULL
), firsts AS (
    SELECT m.device_id, m.experiment_id,
           min((SELECT r.ts FROM readings r
                 WHERE r.device_id = m.device_id AND r.metric = m.metric
                   AND r.experiment_id = m.experiment_id
                 ORDER BY r.ts LIMIT 1)) AS first_ts
      FROM metrics m
     WHERE m.metric IS NOT NULL
     GROUP BY m.device_id, m.experiment_id
)
INSERT INTO device_status (experiment_id, device_id, status, ts, last_seen, detail)
SELECT f.experiment_id, f.device_id, 'online', f.first_ts, f.first_ts, 'first report'
  FROM firsts f
 WHERE f.first_ts IS NOT NULL
ON CONFLICT (device_id, ts, status) DO NOTHING;
