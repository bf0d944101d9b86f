package main

import (
	"bytes"
	"context"
	"regexp"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

// TestDemoRunsTheWholeFlow runs the demo's flow in process on a fresh migrated database, as
// `billingd demo` does, and checks its summary: every charge in its expected final state, paid
// exactly once at Stripe, and the ledger equal to what Stripe kept.
func TestDemoRunsTheWholeFlow(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, err := openDemoPool(ctx, dbtest.NewDB(t))
	require.NoError(t, err)
	t.Cleanup(pool.Close)

	var out bytes.Buffer
	rep, err := runDemo(ctx, pool, &progress{out: &out, timeout: demoStepTimeout}, testLogger(t))
	require.NoError(t, err, out.String())
	rep.print(&out)
	t.Log("\n" + out.String())

	type key struct{ customer, source string }
	got := map[key]demoChargeRow{}
	for _, c := range rep.Charges {
		got[key{c.Customer, c.Source}] = c
	}
	want := map[key]struct {
		status   string
		amount   int64
		currency string
	}{
		{"alice", "installment"}: {"succeeded", 15000, "usd"},
		{"alice", "topup"}:       {"succeeded", 4700, "usd"},
		{"alice", "adhoc"}:       {"succeeded", 2500, "usd"},
		{"bob", "installment"}:   {"recovered", 12000, "jpy"},
	}
	require.Len(t, rep.Charges, len(want), "one charge per source, no more")
	for k, w := range want {
		c, ok := got[k]
		require.True(t, ok, "no %s charge for %s", k.source, k.customer)
		require.Equal(t, w.status, c.Status, "charge %d (%s %s)", c.ID, k.customer, k.source)
		require.Equal(t, w.status, c.Expected)
		require.Equal(t, w.amount, c.Amount)
		require.Equal(t, w.currency, c.Currency)
		require.Equal(t, 1, c.StripePayments, "charge %d paid exactly once at Stripe", c.ID)
		require.Regexp(t, `^pi_`, c.PaymentIntent)
	}
	require.Equal(t, []demoLedgerRow{
		{Currency: "jpy", Billingd: 12000, Stripe: 12000},
		{Currency: "usd", Billingd: 22200, Stripe: 22200},
	}, rep.Ledger)
	require.Empty(t, rep.Problems)

	// The progress output: one line per step with its time, then the summary.
	for _, line := range []string{
		`alice saves a card \(pm_card_visa\) +\d+\.\d\ds  setup session \d+ completed`,
		`bob's installment plan: his card declines +\d+\.\d\ds  charge \d+ for ¥12,000: attempt declined \(generic_decline\)`,
		`bob is notified with a recovery link +\d+\.\d\ds  signed POST to the application: pay ¥12,000`,
		`bob follows the link +\d+\.\d\ds  303 See Other`,
		`bob pays on the page with pm_card_visa +\d+\.\d\ds  back at /recover/done; charge \d+ recovered`,
		`bob +installment +¥12,000 +recovered +ok +pi_\w+ +1x`,
		`usd +\$222\.00 +\$222\.00 +equal`,
		`the ledger equals what Stripe collected`,
	} {
		require.Regexp(t, regexp.MustCompile(line), out.String())
	}
}

// TestDemoCommandOnADatabaseURL runs `billingd demo` itself with DATABASE_URL naming a server:
// it makes a fresh database there, ends with its summary and exit status 0, and drops the
// database again.
func TestDemoCommandOnADatabaseURL(t *testing.T) {
	t.Parallel()
	server := dbtest.ServerURL(t)
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"demo"}, envOf(map[string]string{"DATABASE_URL": server}), &stdout, &stderr)
	t.Log("\n" + stdout.String() + stderr.String())
	require.NoError(t, err)
	require.Contains(t, stdout.String(), "billingd demo: OK")
	require.Contains(t, stdout.String(), "the ledger equals what Stripe collected")

	m := regexp.MustCompile(`fresh database (billingd_demo_[0-9a-f]+) on the DATABASE_URL server`).FindStringSubmatch(stdout.String())
	require.NotNil(t, m, "the demo says which database it made")
	conn, err := pgx.Connect(context.Background(), server)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var exists bool
	require.NoError(t, conn.QueryRow(context.Background(), `select exists (select 1 from pg_database where datname = $1)`, m[1]).Scan(&exists))
	require.False(t, exists, "the demo drops the database it made")
}
