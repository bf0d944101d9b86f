package main

import (
	"bytes"
	"context"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// The chaos command as documented, with tiny parameters: two replicas, 50 charges, one kill.
// It builds cmd/billingd, runs it as replicas, kills one with SIGKILL, settles, and must report
// every charge settled with none duplicated or lost and the ledger equal to stripefake.
func TestChaosCommand(t *testing.T) {
	t.Parallel()
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"chaos",
		"-database-url", dbtest.ServerURL(t),
		"-replicas", "2", "-workers", "5", "-charges", "50", "-decline-share", "0.2",
		"-duration", "8s", "-kill-every", "2s", "-kills", "1", "-down", "300ms",
		"-settle-timeout", "40s",
	}, func(string) string { return "" }, &out, &errOut)
	t.Log(out.String())
	require.NoError(t, err, errOut.String())
	for _, want := range []string{
		`kill -9 replica \d`,
		`charges attempted\s+50\n`,
		`duplicated\s+0 `,
		`lost\s+0 `,
		`wrong / unsettled\s+0 / 0`,
		`ledger (\d+) cents, stripefake net (\d+) cents: equal`,
		`verdict: OK`,
	} {
		require.Regexp(t, regexp.MustCompile(want), out.String())
	}
	// Some charges were collected, some declined: both paths ran.
	require.Regexp(t, `collected\s+[1-9]\d*`, out.String())
	require.Regexp(t, `declined/recovering\s+[1-9]\d*`, out.String())
}

func TestUsage(t *testing.T) {
	t.Parallel()
	var out, errOut bytes.Buffer
	require.ErrorIs(t, run(context.Background(), nil, func(string) string { return "" }, &out, &errOut), errUsage)
	require.Contains(t, errOut.String(), "chaos")
	require.ErrorIs(t, run(context.Background(), []string{"chaos", "-h"}, func(string) string { return "" }, &out, &errOut), errUsage)
	require.Contains(t, errOut.String(), "-replicas")
	require.ErrorIs(t, run(context.Background(), []string{"nope"}, func(string) string { return "" }, &out, &errOut), errUsage)
}
