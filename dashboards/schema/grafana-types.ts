// The TypeScript types grafana-dashboard.schema.json is generated from (make -C dashboards/schema):
// Grafana's own, from the npm package @grafana/schema at the version pinned in package.json (the
// Grafana docker-compose runs). Each exported type becomes one definition of the schema:
//   Dashboard                      the dashboard JSON model, as `import { Dashboard } from '@grafana/schema'`
//   FieldConfig                    a panel's fieldConfig.defaults (and the ids of its overrides' properties)
//   PanelOptions_<plugin id>       a core panel plugin's `options`
//   PanelFieldConfig_<plugin id>   its fieldConfig.defaults.custom (plugins that have one)
// (plugin ids with '-' written with '_'). Add a panel plugin here before a dashboard uses it.
import type { Dashboard as GrafanaDashboard, FieldConfig as GrafanaFieldConfig } from '@grafana/schema';

import type * as annolist from '@grafana/schema/dist/esm/raw/composable/annotationslist/panelcfg/x/AnnotationsListPanelCfg_types.gen';
import type * as barchart from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen';
import type * as bargauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as candlestick from '@grafana/schema/dist/esm/raw/composable/candlestick/panelcfg/x/CandlestickPanelCfg_types.gen';
import type * as canvas from '@grafana/schema/dist/esm/raw/composable/canvas/panelcfg/x/CanvasPanelCfg_types.gen';
import type * as dashlist from '@grafana/schema/dist/esm/raw/composable/dashboardlist/panelcfg/x/DashboardListPanelCfg_types.gen';
import type * as datagrid from '@grafana/schema/dist/esm/raw/composable/datagrid/panelcfg/x/DatagridPanelCfg_types.gen';
import type * as gauge from '@grafana/schema/dist/esm/raw/composable/gauge/panelcfg/x/GaugePanelCfg_types.gen';
import type * as geomap from '@grafana/schema/dist/esm/raw/composable/geomap/panelcfg/x/GeomapPanelCfg_types.gen';
import type * as heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';
import type * as histogram from '@grafana/schema/dist/esm/raw/composable/histogram/panelcfg/x/HistogramPanelCfg_types.gen';
import type * as logs from '@grafana/schema/dist/esm/raw/composable/logs/panelcfg/x/LogsPanelCfg_types.gen';
import type * as news from '@grafana/schema/dist/esm/raw/composable/news/panelcfg/x/NewsPanelCfg_types.gen';
import type * as nodeGraph from '@grafana/schema/dist/esm/raw/composable/nodegraph/panelcfg/x/NodeGraphPanelCfg_types.gen';
import type * as piechart from '@grafana/schema/dist/esm/raw/composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as statetimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as statushistory from '@grafana/schema/dist/esm/raw/composable/statushistory/panelcfg/x/StatusHistoryPanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as text from '@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as trend from '@grafana/schema/dist/esm/raw/composable/trend/panelcfg/x/TrendPanelCfg_types.gen';
import type * as xychart from '@grafana/schema/dist/esm/raw/composable/xychart/panelcfg/x/XYChartPanelCfg_types.gen';

export type Dashboard = GrafanaDashboard;
export type FieldConfig = GrafanaFieldConfig;

export type PanelOptions_annolist = annolist.Options;
export type PanelOptions_barchart = barchart.Options;
export type PanelFieldConfig_barchart = barchart.FieldConfig;
export type PanelOptions_bargauge = bargauge.Options;
export type PanelOptions_candlestick = candlestick.Options;
export type PanelFieldConfig_candlestick = candlestick.FieldConfig;
export type PanelOptions_canvas = canvas.Options;
export type PanelOptions_dashlist = dashlist.Options;
export type PanelOptions_datagrid = datagrid.Options;
export type PanelOptions_gauge = gauge.Options;
export type PanelOptions_geomap = geomap.Options;
export type PanelOptions_heatmap = heatmap.Options;
export type PanelFieldConfig_heatmap = heatmap.FieldConfig;
export type PanelOptions_histogram = histogram.Options;
export type PanelFieldConfig_histogram = histogram.FieldConfig;
export type PanelOptions_logs = logs.Options;
export type PanelOptions_news = news.Options;
export type PanelOptions_nodeGraph = nodeGraph.Options;
export type PanelOptions_piechart = piechart.Options;
export type PanelFieldConfig_piechart = piechart.FieldConfig;
export type PanelOptions_stat = stat.Options;
export type PanelOptions_state_timeline = statetimeline.Options;
export type PanelFieldConfig_state_timeline = statetimeline.FieldConfig;
export type PanelOptions_status_history = statushistory.Options;
export type PanelFieldConfig_status_history = statushistory.FieldConfig;
export type PanelOptions_table = table.Options;
export type PanelFieldConfig_table = table.FieldConfig;
export type PanelOptions_text = text.Options;
export type PanelOptions_timeseries = timeseries.Options;
export type PanelFieldConfig_timeseries = timeseries.FieldConfig;
export type PanelOptions_trend = trend.Options;
export type PanelFieldConfig_trend = trend.FieldConfig;
export type PanelOptions_xychart = xychart.Options;
export type PanelFieldConfig_xychart = xychart.FieldConfig;
