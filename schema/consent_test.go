package schema_test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

// TestRevokeConsent withdraws consents through billing.revoke_consent: by use, then all, twice
// (the second call revokes nothing), and checks that each bad input is refused with a hint and
// changes nothing.
func TestRevokeConsent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFinanceDB(t)
	c := f.customer(t, dbtest.CustomerOpts{Ref: "acme", Usage: []string{"installments", "topups"}}, "usd")
	_, err := f.owner.Exec(ctx, `insert into billing.consents
		(customer_id, usage, terms_version, agreement, timing, amount_basis, cancellation_policy, accepted_at)
		values ($1, '{adhoc}', 'v1', 'I agree.', 'when finance asks', 'the amount due', 'withdraw any time', now())`, c.ID)
	require.NoError(t, err)
	other := f.customer(t, dbtest.CustomerOpts{Ref: "other"}, "usd")

	active := func(customerID int64) []string {
		t.Helper()
		var uses []string
		require.NoError(t, f.owner.QueryRow(ctx, `select coalesce(array_agg(u order by u), '{}') from billing.consents k, unnest(k.usage) u
			where k.customer_id = $1 and k.revoked_at is null`, customerID).Scan(&uses))
		return uses
	}
	revoke := func(args ...any) (int, error) {
		var n int
		err := f.owner.QueryRow(ctx, `select billing.revoke_consent($1, $2, $3)`, args...).Scan(&n)
		return n, err
	}

	for _, tc := range []struct {
		name       string
		ref        any
		reason     any
		usage      any
		code, text string
	}{
		{"no customer_ref", nil, "x", nil, "22023", "customer_ref is required"},
		{"blank reason", "acme", "  ", nil, "22023", "reason is required"},
		{"long reason", "acme", strings.Repeat("r", 1001), nil, "22023", "longer than 1000"},
		{"unknown use", "acme", "x", "subscriptions", "22023", "is not a use"},
		{"unknown customer", "nobody", "x", nil, "P0002", "no customer with customer_ref 'nobody'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.snapshot(t)
			_, err := revoke(tc.ref, tc.reason, tc.usage)
			pgErr := requirePgError(t, err, tc.code, tc.text)
			require.NotEmpty(t, pgErr.Hint)
			require.Equal(t, before, f.snapshot(t))
		})
	}

	n, err := revoke("acme", "customer turned auto top-up off", " Topups ")
	require.NoError(t, err)
	require.Equal(t, 1, n, "the consent covering top-ups, whole")
	require.Equal(t, []string{"adhoc"}, active(c.ID))
	var reason string
	require.NoError(t, f.owner.QueryRow(ctx, `select revoked_reason from billing.consents
		where customer_id = $1 and revoked_at is not null`, c.ID).Scan(&reason))
	require.Equal(t, "customer turned auto top-up off", reason)

	n, err = revoke("acme", "customer closed the account", nil)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Empty(t, active(c.ID))
	n, err = revoke("acme", "customer closed the account", nil)
	require.NoError(t, err)
	require.Zero(t, n, "nothing left to revoke")
	require.Equal(t, []string{"adhoc", "installments", "topups"}, active(other.ID), "another customer's consents stand")

	// The database refuses a revocation without its reason, however it is written.
	_, err = f.owner.Exec(ctx, `update billing.consents set revoked_at = now() where customer_id = $1`, other.ID)
	requirePgError(t, err, "23514", "consents_revoked_reason_check")
}
