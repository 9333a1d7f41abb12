// Contract check between pkg/exchange/worker.ps1 and the Go side, on the
// script's syntax tree (tree-sitter-powershell, as check.mjs parses it).
//
// The worker runs under Set-StrictMode -Version 2.0, where reading a
// property an object lacks is a terminating error, and the Go side omits
// false and empty fields of a request (json omitempty). So every member
// read on a request object ($req/$Req, kind "request") or on a call
// ($call/$Call, kind "call") must either go through Get-WireField (which
// looks the property up first) or name a field that protocol.go always
// sends (a field of Request or Call without omitempty). This program
// finds every such read, fails on the ones that are neither, and also
// closes the ways around the rule: request data lands only in variables
// named $req or $call (ConvertFrom-Json results, foreach variables, the
// parameters of the script's functions that receive them).
//
// It also records what the simulator must model about the script (the
// unguarded reads, which it refuses to answer without; the common
// parameters of the cmdlet call; the remote session's options; the culture;
// which functions each op reaches; whether the bootstrap checks the
// language mode) in pkg/exchange/worker_contract.json, which the Go tests
// and tests/exchangesim embed.
//
// Usage (from the repository root):
//   node contract.mjs --check     fail on violations or a stale worker_contract.json
//   node contract.mjs --write     rewrite worker_contract.json (fails on violations)
//   node contract.mjs --selftest  prove the check fails on a script with one
//                                 unguarded read of an optional field added

import v8 from 'node:v8';
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Parser, Language } from 'web-tree-sitter';

v8.setFlagsFromString('--liftoff-only');

const WORKER = 'pkg/exchange/worker.ps1';
const BOOTSTRAP = 'pkg/exchange/bootstrap.ps1';
const PROTOCOL = 'pkg/exchange/protocol.go';
const CONTRACT = 'pkg/exchange/worker_contract.json';

// Variables that hold wire objects, by kind (PowerShell names are
// case-insensitive).
const WIRE_VARS = { req: 'request', call: 'call' };
// Functions that read an optional field safely.
const GUARDS = new Set(['get-wirefield', 'get-requiredfield']);
// Members every object has.
const INTRINSIC = new Set(['psobject', 'pstypenames', 'gettype', 'tostring']);

await Parser.init();
const require = createRequire(import.meta.url);
const parser = new Parser();
parser.setLanguage(await Language.load(require.resolve('tree-sitter-powershell/tree-sitter-powershell.wasm')));

// alwaysSent reads protocol.go's Request and Call structs: a field without
// omitempty is in every request the Go side encodes.
function alwaysSent(goSource) {
  const out = {};
  for (const [kind, type] of [['request', 'Request'], ['call', 'Call']]) {
    const m = goSource.match(new RegExp(`type ${type} struct \\{([\\s\\S]*?)\\n\\}`));
    if (!m) throw new Error(`${PROTOCOL}: type ${type} struct not found`);
    out[kind] = [];
    for (const tag of m[1].matchAll(/json:"([^"]*)"/g)) {
      const [name, ...opts] = tag[1].split(',');
      if (name !== '-' && name !== '' && !opts.includes('omitempty')) out[kind].push(name);
    }
    out[kind].sort();
  }
  return out;
}

const varName = (n) => n.text.replace(/^[$@]/, '').replace(/^(script|global|local|private):/i, '').toLowerCase();
const line = (n) => n.startPosition.row + 1;
const unquote = (s) => s.replace(/^['"]|['"]$/g, '');

// stripWrappers descends through the single-child expression wrappers the
// grammar puts around every value.
function core(n) {
  while (n && n.namedChildCount === 1 && !['variable', 'member_access', 'string_literal', 'integer_literal', 'command', 'element_access'].includes(n.type)) {
    n = n.namedChildren[0];
  }
  return n;
}

function memberName(n) {
  const mn = n.namedChildren.find((c) => c.type === 'member_name');
  return mn ? mn.text : '';
}

// kindOf types an expression: a wire variable, or the call/calls member of
// a request.
function kindOf(n) {
  n = core(n);
  if (!n) return null;
  if (n.type === 'variable') return WIRE_VARS[varName(n)] ?? null;
  if (n.type === 'member_access') {
    const obj = kindOf(n.namedChildren[0]);
    const name = memberName(n).toLowerCase();
    if (obj === 'request' && name === 'call') return 'call';
    if (obj === 'request' && name === 'calls') return 'calls';
    return null;
  }
  if (n.type === 'command') {
    const name = commandName(n).toLowerCase();
    if (GUARDS.has(name)) {
      const args = commandArgs(n);
      if (args.length >= 2 && kindOf(args[0]) === 'request') {
        const field = unquote(core(args[1])?.text ?? '').toLowerCase();
        if (field === 'call') return 'call';
        if (field === 'calls') return 'calls';
      }
    }
    return null;
  }
  if (n.type === 'parenthesized_expression' || n.type === 'array_expression') {
    const inner = n.descendantsOfType('command')[0] ?? n.descendantsOfType('member_access')[0];
    return inner ? kindOf(inner) : null;
  }
  return null;
}

function commandName(cmd) {
  const n = cmd.namedChildren.find((c) => c.type === 'command_name');
  return n ? n.text : '';
}

// commandArgs returns a command's positional arguments (values that do not
// follow a -Parameter).
function commandArgs(cmd) {
  const els = cmd.namedChildren.find((c) => c.type === 'command_elements');
  if (!els) return [];
  const out = [];
  let afterParam = false;
  for (const c of els.namedChildren) {
    if (c.type === 'command_argument_sep') continue;
    if (c.type === 'command_parameter') { afterParam = !c.text.endsWith(':'); continue; }
    if (afterParam) { afterParam = false; continue; }
    out.push(c);
  }
  return out;
}

// namedArg returns the value given to -Name in a command, as text.
function namedArg(cmd, name) {
  const els = cmd.namedChildren.find((c) => c.type === 'command_elements');
  if (!els) return undefined;
  const kids = els.namedChildren.filter((c) => c.type !== 'command_argument_sep');
  for (let i = 0; i < kids.length; i++) {
    const c = kids[i];
    if (c.type !== 'command_parameter') continue;
    const [p, inline] = c.text.slice(1).split(':');
    if (p.toLowerCase() !== name.toLowerCase()) continue;
    if (inline !== undefined) return inline;
    return kids[i + 1] ? unquote(core(kids[i + 1]).text) : true;
  }
  return undefined;
}

function analyse(src, file) {
  const tree = parser.parse(src);
  const root = tree.rootNode;
  const violations = [];
  const reads = { request: new Map(), call: new Map() };
  const fail = (n, msg) => violations.push(`${file}:${line(n)}: ${msg}`);

  // Functions: name → {params, node}.
  const functions = new Map();
  for (const f of root.descendantsOfType('function_statement')) {
    const nameNode = f.namedChildren.find((c) => c.type === 'function_name');
    const params = f.descendantsOfType('script_parameter').map((p) => varName(p.descendantsOfType('variable')[0]));
    functions.set(nameNode.text.toLowerCase(), { name: nameNode.text, params, node: f });
  }

  // 1. Member reads on wire objects.
  for (const m of root.descendantsOfType('member_access')) {
    const kind = kindOf(m.namedChildren[0]);
    if (kind !== 'request' && kind !== 'call') continue;
    const field = memberName(m);
    if (INTRINSIC.has(field.toLowerCase())) continue;
    if (!reads[kind].has(field)) reads[kind].set(field, []);
    reads[kind].get(field).push(line(m));
  }

  // 2. Where request data may land.
  for (const c of root.descendantsOfType('command')) {
    const name = commandName(c).toLowerCase();
    if (name === 'convertfrom-json') {
      const asg = ancestor(c, 'assignment_expression');
      const left = asg && core(asg.namedChildren[0]);
      if (!left || left.type !== 'variable' || WIRE_VARS[varName(left)] !== 'request') {
        fail(c, 'a ConvertFrom-Json result must be assigned to $req, so the contract check sees every read of it');
      }
    }
    const fn = functions.get(name);
    if (!fn || GUARDS.has(name)) continue;
    const args = commandArgs(c);
    args.forEach((a, i) => {
      const kind = kindOf(a);
      if (!kind) return;
      const want = kind === 'calls' ? null : kind;
      const param = fn.params[i];
      if (!want || !param || WIRE_VARS[param] !== want) {
        fail(a, `${fn.name} receives ${kind} data in parameter ${param ? '$' + param : i}: name it $${want === 'call' ? 'Call' : 'Req'} so the contract check sees its reads`);
      }
    });
  }
  for (const f of root.descendantsOfType('foreach_statement')) {
    const v = f.namedChildren.find((c) => c.type === 'variable');
    const src = f.namedChildren.find((c) => c.type === 'pipeline');
    if (src && kindOf(src) === 'calls' && WIRE_VARS[varName(v)] !== 'call') {
      fail(f, 'a loop over the calls of a request must name its variable $call');
    }
  }
  for (const a of root.descendantsOfType('assignment_expression')) {
    const left = core(a.namedChildren[0]);
    const right = a.namedChildren[a.namedChildCount - 1];
    const kind = kindOf(right);
    if (kind && kind !== 'calls' && !(left.type === 'variable' && WIRE_VARS[varName(left)] === kind)) {
      fail(a, `${kind} data assigned to ${left.text}: keep it in $${kind === 'call' ? 'call' : 'req'}`);
    }
  }
  const guard = functions.get('get-wirefield');
  if (!guard || !guard.node.text.includes('.PSObject.Properties[')) {
    violations.push(`${file}: Get-WireField must exist and look the property up through .PSObject.Properties[...]`);
  }

  // 3. What the simulator models.
  const facts = { invoke_common: {}, session_option: {}, thread_culture: '', ops: {} };
  for (const c of root.descendantsOfType('command')) {
    const els = c.namedChildren.find((x) => x.type === 'command_elements');
    if (els && els.namedChildren.some((x) => x.text.startsWith('@'))) {
      for (const p of ['ErrorAction', 'WarningAction']) {
        const v = namedArg(c, p);
        if (v !== undefined && ancestorFunction(c) === 'invoke-allowed') facts.invoke_common[p] = v;
      }
    }
    if (commandName(c).toLowerCase() === 'new-pssessionoption') {
      for (const p of ['Culture', 'UICulture', 'IdleTimeout']) {
        const v = namedArg(c, p);
        if (v !== undefined) facts.session_option[p] = /^\d+$/.test(v) ? Number(v) : v;
      }
    }
  }
  const assigned = new Map();
  for (const a of root.descendantsOfType('assignment_expression')) {
    assigned.set(a.namedChildren[0].text.trim().toLowerCase(), a.namedChildren[a.namedChildCount - 1]);
  }
  for (const [left, right] of assigned) {
    if (!left.endsWith('.currentculture')) continue;
    let value = right;
    const v = core(right);
    if (v && v.type === 'variable' && assigned.has(v.text.toLowerCase())) value = assigned.get(v.text.toLowerCase());
    const s = value.descendantsOfType('string_literal')[0];
    if (s) facts.thread_culture = unquote(s.text);
  }
  // The functions each op of the main switch reaches.
  const calls = (node) => node.descendantsOfType('command').map((c) => commandName(c).toLowerCase()).filter((n) => functions.has(n));
  const reach = (names) => {
    const seen = new Set();
    const todo = [...names];
    while (todo.length) {
      const n = todo.pop();
      if (seen.has(n)) continue;
      seen.add(n);
      todo.push(...calls(functions.get(n).node));
    }
    return [...seen].map((n) => functions.get(n).name).sort();
  };
  for (const sw of root.descendantsOfType('switch_statement')) {
    if (!sw.text.match(/switch\s*\(\s*\[string\]\$req\.op\s*\)/i)) continue;
    for (const clause of sw.descendantsOfType('switch_clause')) {
      const label = clause.namedChildren[0];
      if (!label || label.type !== 'switch_clause_condition') continue;
      facts.ops[unquote(label.text)] = reach(calls(clause));
    }
  }
  tree.delete();
  return { violations, reads, facts };
}

function ancestor(n, type) {
  for (let p = n.parent; p; p = p.parent) if (p.type === type) return p;
  return null;
}

function ancestorFunction(n) {
  const f = ancestor(n, 'function_statement');
  return f ? f.namedChildren.find((c) => c.type === 'function_name').text.toLowerCase() : '';
}

// check applies the rule: every unguarded read names an always-sent field.
function check(src, file, always) {
  const { violations, reads, facts } = analyse(src, file);
  for (const kind of ['request', 'call']) {
    for (const [field, lines] of reads[kind]) {
      if (!always[kind].includes(field)) {
        violations.push(`${file}:${lines[0]}: reads $${kind === 'call' ? 'Call' : 'Req'}.${field} unguarded, but the Go side omits '${field}' when it is empty (it is not one of ${always[kind].join(', ')}); read it with Get-WireField`);
      }
    }
  }
  return { violations, reads, facts };
}

function contractOf(reads, facts, bootstrapSrc) {
  const sorted = (m) => [...m.keys()].sort();
  const ops = Object.fromEntries(Object.entries(facts.ops).sort(([a], [b]) => a.localeCompare(b)));
  return {
    generated_by: `.ci/pssyntax/contract.mjs from ${WORKER} and ${BOOTSTRAP} (make contract); do not edit`,
    reads: { call: sorted(reads.call), request: sorted(reads.request) },
    invoke_common: facts.invoke_common,
    session_option: facts.session_option,
    thread_culture: facts.thread_culture,
    ops,
    bootstrap_checks_language_mode: /\$ExecutionContext\.SessionState\.LanguageMode/i.test(bootstrapSrc),
  };
}

const mode = process.argv[2] ?? '--check';
const worker = readFileSync(WORKER, 'utf8').replace(/^\uFEFF/, '');
const bootstrap = readFileSync(BOOTSTRAP, 'utf8');
const always = alwaysSent(readFileSync(PROTOCOL, 'utf8'));

if (mode === '--selftest') {
  // One unguarded read of an optional field, in a function that receives
  // the request, and one on a call: both must be caught.
  const cases = [
    ['function Connect-Exchange($Req) {', '    $null = $Req.skip_ca_check', 'skip_ca_check'],
    ['function Invoke-Allowed($Call, [long]$Id, [int]$Page) {', '    $null = $Call.params', 'params'],
    ["'ping' {", '                    $null = $req.page', 'page'],
  ];
  let bad = 0;
  for (const [anchor, inject, field] of cases) {
    if (!worker.includes(anchor)) { console.log(`selftest: anchor ${JSON.stringify(anchor)} not found in ${WORKER}`); bad++; continue; }
    const mutated = worker.replace(anchor, anchor + '\n' + inject);
    const { violations } = check(mutated, WORKER + ' (mutated)', always);
    if (violations.some((v) => v.includes(`.${field} unguarded`))) {
      console.log(`selftest OK: an unguarded read of '${field}' is refused`);
    } else {
      console.log(`selftest FAIL: an unguarded read of '${field}' was not caught`);
      bad++;
    }
  }
  process.exit(bad ? 1 : 0);
}

const { violations, reads, facts } = check(worker, WORKER, always);
const contract = contractOf(reads, facts, bootstrap);
const text = JSON.stringify(contract, null, 2) + '\n';
for (const v of violations) console.log(v);
if (mode === '--write') {
  writeFileSync(CONTRACT, text);
  console.log(`wrote ${CONTRACT}`);
} else {
  let current = '';
  try { current = readFileSync(CONTRACT, 'utf8'); } catch { /* missing */ }
  if (current !== text) {
    violations.push(`${CONTRACT} is stale: run make contract and commit it`);
    console.log(violations[violations.length - 1]);
  }
}
if (violations.length > 0) {
  console.log(`FAIL ${WORKER}: ${violations.length} contract problem(s)`);
  process.exit(1);
}
const n = contract.reads.request.length + contract.reads.call.length;
console.log(`OK ${WORKER}: ${n} unguarded reads, all of fields the Go side always sends (request: ${contract.reads.request.join(', ')}; call: ${contract.reads.call.join(', ')})`);
