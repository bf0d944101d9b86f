package main

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

// TestDemoOnboardsThroughHostedPages runs the demo's onboarding steps against the real daemon
// and stripefake: start_setup, the page announced on billing_setup, the page submitted as the
// customer, and the webhook that saves the card as the customer's default.
func TestDemoOnboardsThroughHostedPages(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, err := openDemoPool(ctx, dbtest.NewDB(t))
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	svc, err := startDemoServices(ctx, pool, testLogger(t))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, svc.stop()) })

	var out bytes.Buffer
	p := &progress{out: &out, timeout: demoStepTimeout}
	s := &demoScenario{demoServices: svc}
	for _, c := range []demoCustomer{demoAlice, demoBob} {
		require.NoError(t, p.step(ctx, c.Ref, func(ctx context.Context) (string, error) { return s.onboard(ctx, c) }), out.String())
	}
	t.Log("\n" + out.String())

	for _, c := range []demoCustomer{demoAlice, demoBob} {
		var stripeCustomer, pm, usage string
		require.NoError(t, pool.QueryRow(ctx, `
select cu.stripe_customer_id, pm.stripe_payment_method_id, array_to_string(co.usage, ',')
from billing.customers cu
join billing.payment_methods pm on pm.id = cu.default_payment_method_id
join billing.consents co on co.customer_id = cu.id and co.payment_method_id = pm.id
where cu.customer_ref = $1`, c.Ref).Scan(&stripeCustomer, &pm, &usage))
		require.Equal(t, c.Usage, usage)
		saved := svc.fake.CustomerPaymentMethods(stripeCustomer)
		require.Len(t, saved, 1, "%s saved one card at Stripe", c.Ref)
		require.Equal(t, pm, saved[0].ID)
		require.Equal(t, c.Card, saved[0].Token, "the card the customer chose on the page")
	}
	require.Contains(t, out.String(), "1. alice")
	require.Contains(t, out.String(), "2. bob")
}
