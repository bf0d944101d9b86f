// Command billingd charges customers' saved Stripe payment methods when money is due, exactly
// once, and brings the customer back when a charge fails.
//
//	billingd demo         the whole flow on a throwaway PostgreSQL and an in-process Stripe emulator
//	billingd run          the daemon (several replicas may share one database)
//	billingd migrate      River's and billing's migrations, idempotent
//	billingd status       what is due, in flight, failed and recovering
//	billingd setup        start saving a payment method; prints the hosted page URL
//	billingd healthcheck  exit 0 when the local daemon answers /healthz (for a shell-less container)
//	billingd version      print the version
//
// Every subcommand takes -h.
package main

import (
	"context"
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
		if err != errUsage {
			fmt.Fprintln(os.Stderr, "billingd:", err)
		}
		os.Exit(exitCode(err))
	}
}
