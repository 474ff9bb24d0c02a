// Writes to stdout the JSON Schema (draft-07) of Grafana's dashboard model and of each core panel
// plugin's options, generated from the TypeScript types of @grafana/schema that grafana-types.ts
// exports. Run through the Makefile (make -C dashboards/schema), which pins the tools (package.json,
// package-lock.json) and writes grafana-dashboard.schema.json.
//
// One generator pass per exported type, every type inlined (expose "none"): ts-json-schema-generator
// names shared definitions by their TypeScript name, and the panel modules all declare an `Options`
// (and `FieldConfig`, `TooltipOptions`...) of their own, which one pass over all of them would
// silently merge into a single definition.
"use strict";

const fs = require("fs");
const path = require("path");
const { createGenerator } = require("ts-json-schema-generator");

const here = __dirname;
const entry = path.join(here, "grafana-types.ts");
const version = (pkg) => require(path.join(here, "node_modules", pkg, "package.json")).version;

const roots = [...fs.readFileSync(entry, "utf8").matchAll(/^export type (\w+)\b/gm)].map((m) => m[1]);

const generator = createGenerator({
  path: entry,
  tsconfig: path.join(here, "tsconfig.json"),
  expose: "none", // inline every type: no shared, name-keyed definitions
  topRef: false,
  jsDoc: "extended", // keep Grafana's descriptions (and @deprecated)
  additionalProperties: false, // TypeScript interfaces (CUE definitions) are closed
  sortProps: true,
});

const definitions = {};
for (const root of roots) {
  const schema = generator.createSchema(root);
  delete schema.$schema;
  if (schema.definitions && Object.keys(schema.definitions).length) {
    // only a recursive type would keep a definition under expose "none"; none of these is
    throw new Error(`${root}: unexpected named definitions ${Object.keys(schema.definitions)}`);
  }
  delete schema.definitions;
  definitions[root] = schema;
}

const grafana = require("@grafana/schema");
const out = {
  $schema: "http://json-schema.org/draft-07/schema#",
  $comment:
    `Generated, do not edit: make -C dashboards/schema. From the TypeScript types of @grafana/schema ` +
    `${version("@grafana/schema")} (dashboards/schema/grafana-types.ts) by ts-json-schema-generator ` +
    `${version("ts-json-schema-generator")} with typescript ${version("typescript")}, one inlined schema ` +
    `per type (dashboards/schema/generate.js).`,
  // what the types do not say: the Grafana version, and the dashboard schemaVersion it writes
  // (its defaultDashboard), i.e. the one it runs no migration on
  "x-grafana": {
    version: version("@grafana/schema"),
    schemaVersion: grafana.defaultDashboard.schemaVersion,
    generator: `ts-json-schema-generator ${version("ts-json-schema-generator")}, typescript ${version("typescript")}`,
  },
  definitions,
};
process.stdout.write(JSON.stringify(out, null, 2) + "\n");
