// PM2's documented ecosystem file, as `pm2 start ecosystem.config.js --env production` runs
// it: a cluster-mode app (the "Cluster Mode" page: instances, exec_mode) with the
// "Environment Variables" page's env and env_production, and the keys of the "Graceful
// Start/Shutdown" and "Memory limit" pages. tests/integration/pm2.rs runs it with
// `cluster-lb run --config ecosystem.config.js --env production`.
module.exports = {
  apps : [{
    name: "api",
    script: "./app.js",
    instances: 4,
    exec_mode: "cluster",
    kill_timeout: 3000,
    max_memory_restart: "100M",
    env: {
      "PORT": 3000,
      "NODE_ENV": "development"
    },
    env_production: {
      "PORT": 80,
      "NODE_ENV": "production",
    }
  }]
}
