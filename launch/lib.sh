# Shared by the launch scripts: print_command prints a command the way a shell would read it
# back (plain words bare, anything else single-quoted), so a --dry-run line can be pasted.
print_command() {
  printf '+'
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+~-]+$ ]]; then printf ' %s' "$arg"; else printf ' %s' "${arg@Q}"; fi
  done
  printf '\n'
}
