// Node-RED settings of the benchmark peer (bench/peers): headless, no HTTP server at all,
// flows and plain-text credentials copied into a temporary userDir by bench/peers/__init__.py.
// The contributed PostgreSQL nodes are not installed: the `pg` client is handed to the Function
// nodes through functionGlobalContext (global.get("pg") in a Function node).
module.exports = {
    flowFile: "flows.json",
    flowFilePretty: true,
    credentialSecret: false, // flows_cred.json is plain JSON holding ${ENV} references, never rewritten
    httpAdminRoot: false, // no editor, no admin API
    httpNodeRoot: false, // no HTTP nodes: with both off Node-RED runs without a web server
    functionGlobalContext: {
        pg: require("pg"),
    },
    functionExternalModules: false,
    telemetry: { enabled: false },
    diagnostics: { enabled: false, ui: false },
    runtimeState: { enabled: false, ui: false },
    externalModules: { autoInstall: false, palette: { allowInstall: false } },
    editorTheme: { projects: { enabled: false } },
    contextStorage: { default: { module: "memory" } },
    logging: {
        console: { level: process.env.PEER_NODE_RED_LOG_LEVEL || "info", metrics: false, audit: false },
    },
};
