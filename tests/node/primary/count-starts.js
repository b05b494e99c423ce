// Loaded with NODE_OPTIONS=--require: appends one line per Node process that starts the
// program (its pid) to $STARTS, to count how often a program's start-up code runs. It reads
// nothing of the cluster module, so it does not look like a program with a primary branch.
'use strict';
require('node:fs').appendFileSync(process.env.STARTS, `${process.pid}\n`);
