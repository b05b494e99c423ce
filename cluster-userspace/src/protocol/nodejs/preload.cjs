// cluster-lb's Node preload. cluster-lb loads it with NODE_OPTIONS=--require into the Node
// processes it starts (never into their own children: NODE_OPTIONS is put back as it was).
//
// In a worker (CLUSTER_LB_WORKER_ID is set; Node deletes NODE_UNIQUE_ID before preloads run)
// it only watches whether the program reads
// cluster.isPrimary, isMaster or isWorker, and tells cluster-lb once: a program that does has a
// primary branch, which cluster-lb then runs (a plain server never reads them).
//
// In the program's primary process (CLUSTER_LB_RPC_FD is set) it makes Node's own primary
// code run on top of cluster-lb. Node's internal/cluster/primary.js takes child_process.fork
// when it is first loaded; this preload loads it with a fork of its own in place, so that
// cluster.fork(), cluster.workers, every Worker method and every event are Node's own code,
// and only the child process under each Worker is cluster-lb's: a worker started (or already
// running) under cluster-lb, with its own socket in the kernel's group. The wire protocol is
// cluster-userspace/src/protocol/nodejs/primary.rs.
'use strict';

(function clusterLb() {
  const env = process.env;
  // NODE_OPTIONS as the user had it, for the program and its own children.
  if ('CLUSTER_LB_NODE_OPTIONS' in env) {
    env.NODE_OPTIONS = env.CLUSTER_LB_NODE_OPTIONS;
    delete env.CLUSTER_LB_NODE_OPTIONS;
  } else {
    delete env.NODE_OPTIONS;
  }
  if ('CLUSTER_LB_RPC_FD' in env) {
    const fd = Number(env.CLUSTER_LB_RPC_FD);
    delete env.CLUSTER_LB_RPC_FD;
    runPrimary(fd);
  } else if ('CLUSTER_LB_WORKER_ID' in env) {
    watchRole();
  }

  // ---- workers --------------------------------------------------------------------------

  function watchRole() {
    const cluster = require('cluster');
    let told = false;
    // Primary-only calls in a worker: a program that calls cluster.setupPrimary({ exec }) or
    // fork() without checking isPrimary is only ever a primary under Node (its workers run
    // another file). Its primary branch runs in cluster-lb's primary process from now on, and
    // this process has nothing to do: it says so and exits.
    for (const name of ['setupPrimary', 'setupMaster', 'fork']) {
      if (typeof cluster[name] === 'function') continue;
      Object.defineProperty(cluster, name, {
        configurable: true,
        enumerable: true,
        writable: true,
        value: function primaryOnly() {
          if (typeof process.send === 'function' && process.connected) {
            process.send({ cmd: 'NODE_CLB_ROLE', call: name }, ignoreSendError);
          }
          process.stderr.write(`cluster-lb: this program calls cluster.${name}() in a worker: its primary branch runs in its own primary process, and this worker leaves\n`);
          process.exit(0);
        },
      });
    }
    for (const name of ['isPrimary', 'isMaster', 'isWorker']) {
      const descriptor = Object.getOwnPropertyDescriptor(cluster, name);
      if (!descriptor || !('value' in descriptor)) continue;
      const value = descriptor.value;
      Object.defineProperty(cluster, name, {
        configurable: true,
        enumerable: true,
        get() {
          if (!told && readByProgram(this)) {
            told = true;
            if (typeof process.send === 'function' && process.connected) {
              process.send({ cmd: 'NODE_CLB_ROLE', read: name }, ignoreSendError);
            }
          }
          return value;
        },
        set(next) {
          Object.defineProperty(cluster, name, { value: next, writable: true, configurable: true, enumerable: true });
        },
      });
    }
  }

  // A note to cluster-lb that cannot be sent (the primary just closed the channel: the
  // worker is leaving) is of no use to anyone. Without a callback, Node would emit the write
  // error on process, and so on cluster.worker, where the program never expects one.
  function ignoreSendError() {}

  // A read from the program's code (its own files or its packages), not from Node's: Node reads
  // every export of a built-in when it builds its ES module facade.
  function readByProgram() {
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 4;
    const holder = {};
    Error.captureStackTrace(holder, readByProgram);
    Error.stackTraceLimit = limit;
    const frames = String(holder.stack).split('\n').slice(1);
    // frames[0] is the getter; frames[1] its caller.
    const caller = frames[1] || '';
    return !caller.includes('(node:') && !/^\s*at node:/.test(caller);
  }

  // ---- the program's primary ------------------------------------------------------------

  function runPrimary(rpcFd) {
    const fs = require('fs');
    const path = require('path');
    const EventEmitter = require('events');
    const { PassThrough } = require('stream');
    const os = require('os');
    // The directory cluster-lb started this process in, which is also where it starts workers.
    const startCwd = currentCwd();

    if (typeof process.send !== 'function' || !process.channel) {
      process.emitWarning('cluster-lb: no channel to cluster-lb; cluster.fork() will not work');
      return;
    }
    if (Array.isArray(process.moduleLoadList) && process.moduleLoadList.includes('NativeModule cluster')) {
      process.emitWarning('cluster-lb: the cluster module was loaded before cluster-lb\'s preload; cluster.fork() starts workers outside cluster-lb');
      return;
    }

    // ---- the blocking channel: fork, adopt and kill answer before they return ----
    const inbox = Buffer.alloc(64 * 1024);
    function rpc(request) {
      const line = Buffer.from(JSON.stringify(request) + '\n');
      for (let sent = 0; sent < line.length;) sent += fs.writeSync(rpcFd, line, sent);
      const chunks = [];
      for (;;) {
        const n = fs.readSync(rpcFd, inbox, 0, inbox.length, null);
        if (n === 0) throw new Error('cluster-lb: the channel to cluster-lb closed');
        chunks.push(Buffer.from(inbox.subarray(0, n)));
        if (inbox[n - 1] === 10) break;
      }
      return JSON.parse(Buffer.concat(chunks).toString());
    }

    function clbError(message, code) {
      const error = new Error(`cluster-lb: ${message}`);
      if (code) error.code = code;
      return error;
    }

    // ---- the child processes under Node's Worker objects ----
    const children = new Map(); // worker id -> WorkerProcess
    let adoption = null;        // set while cluster.fork() takes an offered worker
    // Workers cluster-lb is starting or will offer (a restart, a reload's replacement): like a
    // child process of its own, they keep the primary up while it has no Worker left.
    let awaited = 0;

    function refChannel() {
      let live = awaited;
      for (const child of children.values()) if (child._refed) live++;
      if (live > 0) process.channel.ref(); else process.channel.unref();
    }

    class WorkerProcess extends EventEmitter {
      constructor(id, pid, spec) {
        super();
        this._clbId = id;
        this.pid = pid;
        this.connected = true;
        this.exitCode = null;
        this.signalCode = null;
        this.killed = false;
        this._refed = true;
        this._disconnectEmitted = false;
        this.spawnfile = spec ? spec.execPath : process.execPath;
        this.spawnargs = spec ? [spec.execPath, ...spec.execArgv, spec.exec, ...spec.args] : [];
        this.stdin = null;
        this.stdout = spec && spec.silent ? new PassThrough() : null;
        this.stderr = spec && spec.silent ? new PassThrough() : null;
        this.stdio = [this.stdin, this.stdout, this.stderr];
      }

      send(message, handle, options, callback) {
        if (typeof handle === 'function') {
          callback = handle;
          handle = undefined;
          options = undefined;
        } else if (typeof options === 'function') {
          callback = options;
          options = undefined;
        }
        if (message === undefined) {
          const error = new TypeError('The "message" argument must be specified');
          error.code = 'ERR_MISSING_ARGS';
          throw error;
        }
        if (handle) {
          const error = clbError('worker.send(message, handle) cannot pass a socket or a server to a worker: every worker has its own listening socket already; send the data instead', 'ERR_CLUSTER_LB_HANDLE');
          process.emitWarning(error.message);
          return this._fail(error, callback);
        }
        if (!this.connected) {
          const error = new Error('Channel closed');
          error.code = 'ERR_IPC_CHANNEL_CLOSED';
          return this._fail(error, callback);
        }
        return process.send({ cmd: 'NODE_CLB_SEND', id: this._clbId, msg: message }, undefined, undefined, callback);
      }

      _fail(error, callback) {
        if (typeof callback === 'function') process.nextTick(callback, error);
        else process.nextTick(() => this.emit('error', error));
        return false;
      }

      disconnect() {
        if (!this.connected) {
          const error = new Error('IPC channel is already disconnected');
          error.code = 'ERR_IPC_DISCONNECTED';
          this.emit('error', error);
          return;
        }
        this.connected = false;
        process.send({ cmd: 'NODE_CLB_DISCONNECT', id: this._clbId });
        process.nextTick(() => this._disconnected());
      }

      kill(signal) {
        if (signal === 0) {
          try { process.kill(this.pid, 0); return true; } catch { return false; }
        }
        if (this.exitCode !== null || this.signalCode !== null) return false;
        const name = signalName(signal === undefined ? 'SIGTERM' : signal);
        const answer = rpc({ op: 'kill', id: this._clbId, pid: this.pid, signal: name });
        if (answer.error) {
          if (answer.code === 'ESRCH') return false;
          this.emit('error', clbError(answer.error, answer.code));
          return false;
        }
        this.killed = true;
        return true;
      }

      ref() { this._refed = true; refChannel(); }
      unref() { this._refed = false; refChannel(); }

      _disconnected() {
        this.connected = false;
        if (this._disconnectEmitted) return;
        this._disconnectEmitted = true;
        this.emit('disconnect');
      }

      _exited(code, signal) {
        this._disconnected();
        this.exitCode = code;
        this.signalCode = signal;
        if (this.stdout) this.stdout.end();
        if (this.stderr) this.stderr.end();
        children.delete(this._clbId);
        refChannel();
        this.emit('exit', code, signal);
        this.emit('close', code, signal);
      }
    }

    function signalName(signal) {
      if (typeof signal === 'number') {
        const found = Object.entries(os.constants.signals).find(([, number]) => number === signal);
        if (found) return found[0];
      } else if (typeof signal === 'string' && signal.toUpperCase() in os.constants.signals) {
        return signal.toUpperCase();
      }
      const error = new TypeError(`Unknown signal: ${signal}`);
      error.code = 'ERR_UNKNOWN_SIGNAL';
      throw error;
    }

    // 'pipe', 'inherit' or 'ignore' for stdin, stdout and stderr, and the channel.
    function plainStdio(stdio) {
      if (typeof stdio === 'string') return ['pipe', 'inherit', 'ignore'].includes(stdio);
      if (!Array.isArray(stdio) || stdio.length > 4) return false;
      return stdio.every((entry, i) => (i === 3 ? entry === 'ipc' : entry === i || [undefined, null, 'pipe', 'inherit', 'ignore'].includes(entry)));
    }

    function currentCwd() {
      try { return process.cwd(); } catch { return null; }
    }

    // Without settings.cwd, child_process.fork starts the worker in the primary's current
    // directory, which the program may have changed (process.chdir) since it started.
    function movedCwd() {
      const now = currentCwd();
      return now !== startCwd ? now : null;
    }

    function sameArray(a, b) {
      return Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((x, i) => x === b[i]);
    }

    function sameEnv(forked) {
      const own = Object.keys(process.env);
      const keys = Object.keys(forked).filter((key) => key !== 'NODE_UNIQUE_ID');
      return keys.length === own.length && keys.every((key) => forked[key] === process.env[key]);
    }

    // What primary.js passes child_process.fork (createWorkerProcess).
    function fakeFork(modulePath, args, options) {
      options = options || {};
      if (adoption) {
        const taken = adoption;
        adoption = null;
        return track(new WorkerProcess(taken.id, taken.pid, null));
      }
      if (options.serialization === 'advanced') {
        throw clbError("serialization: 'advanced' is not supported: cluster-lb's channel carries JSON (leave cluster.settings.serialization unset)", 'ERR_CLUSTER_LB_SERIALIZATION');
      }
      if (options.uid != null || options.gid != null) {
        throw clbError('cluster.settings uid and gid are not supported: workers run as the user cluster-lb runs them as (--user)', 'ERR_CLUSTER_LB_USER');
      }
      const stdio = options.stdio;
      if (stdio !== undefined && stdio !== null && !plainStdio(stdio)) {
        throw clbError('cluster.settings.stdio beyond stdin, stdout and stderr (extra pipes, streams, descriptors) is not supported: a worker has its channel and its output only', 'ERR_CLUSTER_LB_STDIO');
      }
      const piped = Array.isArray(stdio) ? stdio[1] === 'pipe' || stdio[2] === 'pipe' : stdio === 'pipe';
      const spec = {
        execPath: options.execPath || process.execPath,
        execArgv: options.execArgv || process.execArgv,
        exec: path.resolve(String(modulePath)),
        args: (args || []).map(String),
        env: Object.fromEntries(Object.entries(options.env || process.env).map(([k, v]) => [k, String(v)])),
        cwd: options.cwd ? path.resolve(String(options.cwd)) : movedCwd(),
        silent: !!options.silent || piped,
        stdio: null,
      };
      spec.default = spec.execPath === process.execPath
        && sameArray(spec.execArgv, process.execArgv)
        && spec.exec === path.resolve(process.argv[1] || '')
        && sameArray(spec.args, process.argv.slice(2))
        && !spec.cwd && !spec.silent
        && sameEnv(spec.env);
      const answer = rpc({ op: 'fork', spec });
      if (answer.error) throw clbError(answer.error, answer.code || 'ERR_CLUSTER_LB_FORK');
      return track(new WorkerProcess(answer.id, answer.pid, spec));
    }

    function track(child) {
      children.set(child._clbId, child);
      refChannel();
      return child;
    }

    // What cluster-lb says about the workers.
    process.on('internalMessage', (message) => {
      if (!message || message.cmd !== 'NODE_CLB') return;
      if (message.ev === 'offer') return adopt(message);
      if (message.ev === 'awaited') {
        awaited = message.count;
        return refChannel();
      }
      if (message.ev === 'exit' && typeof message.awaited === 'number') awaited = message.awaited;
      const child = children.get(message.id);
      if (!child || child.pid !== message.pid) return refChannel();
      switch (message.ev) {
        case 'internal': child.emit('internalMessage', message.msg); break;
        case 'message': child.emit('message', message.msg); break;
        case 'output': {
          const stream = message.fd === 2 ? child.stderr : child.stdout;
          if (stream) stream.write(Buffer.from(message.data, 'base64'));
          break;
        }
        case 'disconnect': child._disconnected(); break;
        case 'exit': child._exited(message.code, message.signal); break;
      }
    });

    // A worker the primary did not fork (one started before it, or a replacement cluster-lb
    // started): taken with cluster.fork(), so the program sees 'fork' and cluster.workers has it.
    function adopt(offer) {
      const answer = rpc({ op: 'adopt', pid: offer.pid });
      if (answer.error) return;
      adoption = answer;
      try {
        cluster.fork();
      } finally {
        adoption = null;
      }
    }

    // Node's primary code takes child_process.fork when it is loaded: load it now, with ours.
    const childProcess = require('child_process');
    const realFork = childProcess.fork;
    childProcess.fork = fakeFork;
    let cluster;
    try {
      cluster = require('cluster');
    } finally {
      childProcess.fork = realFork;
    }
    // Node numbers workers itself; cluster-lb's number (the worker's own cluster.worker.id) is
    // the one to keep, so that both sides name a worker alike.
    const nodeFork = cluster.fork;
    cluster.fork = function fork(env) {
      const worker = nodeFork.call(this, env);
      const id = worker.process._clbId;
      if (id !== undefined && worker.id !== id) {
        delete cluster.workers[worker.id];
        worker.id = id;
        cluster.workers[id] = worker;
      }
      return worker;
    };
    require('module').syncBuiltinESMExports();
    process.channel.unref();
  }
})();
