// OpenCode plugin: every tool call goes through the project's guard hook first, the same
// .claude/hooks/guard_tool_use.py that Claude Code and Codex run, so the three clients refuse
// the same things with the same reasons.
//
// OpenCode's tool call is mapped to the Claude Code PreToolUse payload (bash -> Bash, edit ->
// Edit, ...), the guard reads it on stdin, and a refusal (exit 2, the reason on stderr) is thrown:
// OpenCode then skips the tool and shows the model the reason. Anything else that goes wrong
// (no python3, a crash, a timeout) refuses too: the guard fails closed, and so does this.
//
// Loaded from opencode.json ("plugin": ["./.opencode-plugin/guard.js"]), not from
// .opencode/plugin/: for a .opencode folder OpenCode installs @opencode-ai/plugin from npm at
// start-up, which offline costs 75 s per run. This file imports nothing, so it needs no install.

import { spawnSync } from "node:child_process"
import { fileURLToPath } from "node:url"

const GUARD = fileURLToPath(new URL("../.claude/hooks/guard_tool_use.py", import.meta.url))

// OpenCode tool -> (Claude Code tool, its input built from OpenCode's arguments)
const TOOLS = {
  bash: ["Bash", (a) => ({ command: a.command, description: a.description })],
  edit: ["Edit", (a) => ({ file_path: a.filePath, old_string: a.oldString, new_string: a.newString,
                           replace_all: a.replaceAll })],
  multiedit: ["MultiEdit", (a) => ({ file_path: a.filePath, edits: (a.edits || []).map((e) => (
    { old_string: e.oldString, new_string: e.newString, replace_all: e.replaceAll })) })],
  write: ["Write", (a) => ({ file_path: a.filePath, content: a.content })],
  read: ["Read", (a) => ({ file_path: a.filePath, offset: a.offset, limit: a.limit })],
  grep: ["Grep", (a) => ({ pattern: a.pattern, path: a.path, glob: a.include })],
  glob: ["Glob", (a) => ({ pattern: a.pattern, path: a.path })],
  list: ["LS", (a) => ({ path: a.path })],
  patch: ["apply_patch", (a) => ({ command: a.patchText })],
  apply_patch: ["apply_patch", (a) => ({ command: a.patchText })],
  webfetch: ["WebFetch", (a) => ({ url: a.url })],
  websearch: ["WebSearch", (a) => ({ query: a.query })],
  task: ["Task", (a) => ({ description: a.description, prompt: a.prompt })],
  todowrite: ["TodoWrite", (a) => ({ todos: a.todos })],
  skill: ["Skill", (a) => ({ skill: a.name })],
}

function refusalReason(result) {
  if (result.error) return `the guard hook could not run (${result.error.message}): refused`
  const stderr = (result.stderr || "").trim()
  if (result.status === 0) {
    let decision = null
    try {
      decision = JSON.parse(result.stdout || "null")?.hookSpecificOutput
    } catch {
      return null  // plain output with exit 0: allowed
    }
    return decision?.permissionDecision === "deny" ? decision.permissionDecisionReason || "refused" : null
  }
  if (result.status === 2) return stderr || "refused by the guard hook"
  return `the guard hook failed (exit ${result.status}): ${stderr.split("\n").slice(-3).join(" ")}: refused`
}

export const AutoresearchGuard = async ({ directory }) => ({
  "tool.execute.before": async (input, output) => {
    const [name, toInput] = TOOLS[input.tool] || [input.tool, (a) => a]
    const payload = {
      hook_event_name: "PreToolUse", tool_name: name, tool_input: toInput(output.args || {}),
      cwd: directory, session_id: input.sessionID, client: "opencode",
    }
    const result = spawnSync("python3", [GUARD], { input: JSON.stringify(payload), encoding: "utf8",
                                                  timeout: 10000, cwd: directory })
    const reason = refusalReason(result)
    if (reason) throw new Error(reason)
  },
})
