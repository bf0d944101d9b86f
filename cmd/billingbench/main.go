// Command billingbench measures billingd and proves it under chaos. Every figure in
// BENCHMARKS.md comes from one of its subcommands:
//
//	billingbench pipeline  charges per second through the whole pipeline vs River's no-op jobs
//	billingbench limited   the sustained rate with Stripe latency and a rate limit
//	billingbench due       the due computation of N plans beside a plain-insert baseline, with peak memory
//	billingbench enqueue   billing.enqueue_charge -> PaymentIntent latency (median, p99)
//	billingbench chaos     replicas killed with SIGKILL under stripefake faults: duplicated and lost must be 0
//
// Each builds its own world on a fresh database: on the PostgreSQL server named by
// DATABASE_URL (a database is created there and dropped at the end), or on a throwaway cluster
// started from the installed binaries. Every parameter is a flag; "billingbench <command> -h"
// lists them. Figures are printed as they come; -runs repeats a measurement and prints the
// median. chaos exits 1 when a charge was duplicated or lost.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, errUsage) {
			fmt.Fprintln(os.Stderr, "billingbench:", err)
		}
		os.Exit(exitCode(err))
	}
}
