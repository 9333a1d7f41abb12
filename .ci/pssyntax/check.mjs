// Syntax check for the PowerShell scripts easguard ships (pkg/exchange/*.ps1).
//
// CI has no PowerShell, so the scripts are parsed by an independent parser:
// the tree-sitter PowerShell grammar (npm tree-sitter-powershell, its .wasm)
// run by web-tree-sitter. Every ERROR or MISSING node in the syntax tree is
// reported as file:line:col with the offending source; exit status is 1 if
// any file has one, 2 on usage or I/O errors, 0 otherwise.
//
// Usage: node check.mjs <file.ps1>...

import v8 from 'node:v8';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Parser, Language } from 'web-tree-sitter';

// The grammar's wasm is large: V8's optimising tier spends ~8 s compiling it
// in the background and node waits for that at exit. The baseline compiler
// alone parses these files in milliseconds.
v8.setFlagsFromString('--liftoff-only');

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node check.mjs <file.ps1>...');
  process.exit(2);
}

await Parser.init();
const require = createRequire(import.meta.url);
const wasm = require.resolve('tree-sitter-powershell/tree-sitter-powershell.wasm');
const parser = new Parser();
parser.setLanguage(await Language.load(wasm));

// Quotes source text for a one-line message (newlines show as \n).
const snippet = (s) => JSON.stringify(s.length > 60 ? s.slice(0, 60) + '...' : s);

// Yields every ERROR and MISSING node, outermost first.
function* problems(node) {
  if (node.isError || node.isMissing) yield node;
  if (!node.hasError) return; // hasError covers MISSING descendants too
  for (const child of node.children) yield* problems(child);
}

let failed = 0;
for (const file of files) {
  let original;
  try {
    original = readFileSync(file, 'utf8').replace(/^\uFEFF/, '');
  } catch (e) {
    console.error(`${file}: cannot read: ${e.message}`);
    process.exit(2);
  }
  // Known grammar gap (tree-sitter-powershell 0.26.4): a comma list of
  // unquoted words as a command argument (`-CommandType Cmdlet, Function`)
  // is valid PowerShell but not parsed; easguard's scripts quote such lists.
  const tree = parser.parse(original);
  const lines = original.split('\n');
  const at = ({ row, column }) => `${file}:${row + 1}:${column + 1}`;
  const found = [...problems(tree.rootNode)];
  for (const n of found) {
    const what = n.isMissing
      ? `MISSING ${JSON.stringify(n.type)} (the parser had to invent it)`
      : `ERROR, cannot parse ${snippet(original.slice(n.startIndex, n.endIndex))}`;
    console.log(`${at(n.startPosition)}: syntax error: ${what}`);
    console.log(`    ${(lines[n.startPosition.row] ?? '').replace(/\r$/, '')}`);
  }
  if (found.length > 0) {
    failed++;
    console.log(`FAIL ${file}: ${found.length} syntax problem(s)`);
  } else {
    const fns = tree.rootNode.descendantsOfType('function_statement').length;
    const count = lines.length - (original.endsWith('\n') ? 1 : 0);
    console.log(`OK ${file}: ${count} lines, ${fns} functions, no ERROR/MISSING nodes`);
  }
  tree.delete();
}
process.exit(failed > 0 ? 1 : 0);
