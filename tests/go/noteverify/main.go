// Command noteverify opens a C2SP signed note (a tlog-checkpoint) with
// golang.org/x/mod/sumdb/note, the Go toolchain's own verifier, using the log's
// verifier key. Exit 0: the signature verifies; 1: it does not; 2: misuse.
//
//	noteverify <verifier-key> <note-file>
package main

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/mod/sumdb/note"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: noteverify <verifier-key> <note-file>")
		os.Exit(2)
	}
	verifier, err := note.NewVerifier(strings.TrimSpace(os.Args[1]))
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad verifier key:", err)
		os.Exit(2)
	}
	msg, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	n, err := note.Open(msg, note.VerifierList(verifier))
	if err != nil {
		fmt.Fprintln(os.Stderr, "rejected:", err)
		os.Exit(1)
	}
	lines := strings.SplitN(n.Text, "\n", 4)
	if len(lines) < 3 {
		fmt.Fprintln(os.Stderr, "rejected: not a checkpoint body")
		os.Exit(1)
	}
	fmt.Printf("verified %s: origin=%s size=%s root=%s\n", n.Sigs[0].Name, lines[0], lines[1], lines[2])
}
