package bench

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/stripeapi"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// The chaos run's end-state check finds what it must report: a charge collected twice at
// Stripe (duplicated), a charge on a working card never collected and not scheduled (lost), and
// a ledger that differs from Stripe; and passes a clean end state.
func TestCheckFindsDuplicatedAndLost(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv, err := OpenServer(dbtest.ServerURL(t))
	require.NoError(t, err)
	e, err := NewEnv(ctx, srv, slog.New(slog.NewTextHandler(io.Discard, nil)), EnvOptions{NoRiver: true})
	require.NoError(t, err)
	t.Cleanup(e.Close)
	c, err := e.NewCustomer(ctx, "check", "pm_card_visa")
	require.NoError(t, err)
	ids, err := e.Charges(ctx, []Customer{c, c, c}, []int64{1000, 2000, 3000}, "usd")
	require.NoError(t, err)
	var cus, pm string
	require.NoError(t, e.Pool.QueryRow(ctx, `select c.stripe_customer_id, p.stripe_payment_method_id
		from billing.customers c join billing.payment_methods p on p.id = c.default_payment_method_id where c.id = $1`, c.ID).Scan(&cus, &pm))
	sc := stripeapi.NewClient(secretKey, e.FakeURL, nil, 0)
	collect := func(id int64, amount int64, key string) string {
		pi, err := sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cus, pm, amount, "usd", "check",
			map[string]string{"charge_id": strconv.FormatInt(id, 10)}, key))
		require.NoError(t, err)
		require.Equal(t, "succeeded", string(pi.Status))
		return pi.ID
	}
	succeed := func(id int64, pi string) {
		_, err := e.Pool.Exec(ctx, `update billing.charges set status = 'processing' where id = $1`, id)
		require.NoError(t, err)
		_, err = e.Pool.Exec(ctx, `update billing.charges set status = 'succeeded', payment_intent_id = $2 where id = $1`, id, pi)
		require.NoError(t, err)
	}
	expect := map[int64]expectation{ids[0]: expectCollected, ids[1]: expectCollected, ids[2]: expectCollected}

	// Clean: the first two collected once each, the third declined into recovery.
	succeed(ids[0], collect(ids[0], 1000, "k0"))
	succeed(ids[1], collect(ids[1], 2000, "k1"))
	_, err = e.Pool.Exec(ctx, `update billing.charges set status = 'processing' where id = $1`, ids[2])
	require.NoError(t, err)
	_, err = e.Pool.Exec(ctx, `update billing.charges set status = 'recovering' where id = $1`, ids[2])
	require.NoError(t, err)
	var res ChaosResult
	states, err := e.ChargeStates(ctx, ids)
	require.NoError(t, err)
	require.NoError(t, check(ctx, e, &res, states, expect))
	require.True(t, res.OK(), "%+v", res)
	require.Equal(t, int64(3000), res.Ledger)
	require.Equal(t, 2, res.Collected)
	require.Equal(t, 1, res.Declined)

	// The first charge collected a second time under another key: duplicated, ledger short.
	collect(ids[0], 1000, "k0-again")
	res = ChaosResult{}
	require.NoError(t, check(ctx, e, &res, states, expect))
	require.Equal(t, 1, res.Duplicated)
	require.Equal(t, int64(3000), res.Ledger)
	require.Equal(t, int64(4000), res.StripeNet)
	require.False(t, res.OK())

	// A charge on a working card canceled without being collected: lost.
	states[ids[2]] = ChargeState{Status: "canceled", Amount: 3000}
	res = ChaosResult{}
	require.NoError(t, check(ctx, e, &res, states, expect))
	require.Equal(t, 1, res.Lost)
	require.Equal(t, 1, res.Duplicated)
}
