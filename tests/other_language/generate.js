#!/usr/bin/env node
// A client for sdmesh.v1.Gateway written against protos/sdmesh/v1/gateway.proto alone.
//
//   node generate.js HOST:PORT PROMPT OUTPUT_DIR [SEED] [STEPS]
//
// Streams Gateway.Generate, prints each progress event, writes image_{i}.png and prints their paths.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");

function main() {
  const [address, prompt, outDir, seed, steps] = process.argv.slice(2);
  if (!address || prompt === undefined || !outDir) {
    console.error("usage: node generate.js HOST:PORT PROMPT OUTPUT_DIR [SEED] [STEPS]");
    process.exit(2);
  }
  const definition = protoLoader.loadSync("sdmesh/v1/gateway.proto", {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const sdmesh = grpc.loadPackageDefinition(definition).sdmesh.v1;
  const client = new sdmesh.Gateway(address, grpc.credentials.createInsecure(),
                                    { "grpc.max_receive_message_length": 256 * 1024 * 1024 });

  const request = { prompt, num_inference_steps: steps ? Number(steps) : 4 };
  if (seed !== undefined) request.seed = seed;  // uint64: a decimal string
  const deadline = new Date(Date.now() + 120 * 1000);
  const call = client.Generate(request, { deadline });
  let result = null;
  call.on("data", (event) => {
    if (event.event === "progress") {
      const p = event.progress;
      console.error(`${p.stage} ${p.step}/${p.total_steps}`);
    } else if (event.event === "result") {
      result = event.result;
    }
  });
  call.on("error", (err) => {
    console.error(`Generate failed: ${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  });
  call.on("end", () => {
    if (result === null) {
      console.error("the stream ended without a result");
      process.exit(1);
    }
    fs.mkdirSync(outDir, { recursive: true });
    result.images.forEach((png, i) => {
      const file = path.join(outDir, `image_${i}.png`);
      fs.writeFileSync(file, png);
      console.log(file);
    });
    console.error(`seed ${result.seed}`);
    client.close();
  });
}

main();
