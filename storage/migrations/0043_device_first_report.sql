-- Every device that ever reported has a status. The streams worker now reports a device online
-- at its first reading ("first report", streams.engine.advance), so "online" means one thing
-- everywhere: the last row of device_status (device_last_status, the City Lab overview, the
-- portal). Before, it stored going offline and coming back only, and a device that never fell
-- silent had no row: the overview counted it as "no status yet" while the portal called it
-- online. This gives such devices, already reporting when this runs, their first report at
-- their oldest stored reading. Devices with any status row keep theirs.
INSERT INTO device_status (experiment_id, device_id, status, ts, last_seen, detail)
SELECT d.experiment_id, d.device_id, 'online', f.first_ts, f.first_ts, 'first report'
  FROM devices d
 CROSS JOIN LATERAL (SELECT min(r.ts) AS first_ts FROM readings r WHERE r.device_id = d.device_id) f
 WHERE f.first_ts IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM device_status s WHERE s.device_id = d.device_id)
ON CONFLICT (device_id, ts, status) DO NOTHING;
