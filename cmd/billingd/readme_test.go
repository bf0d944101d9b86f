package main

import (
	"bytes"
	"os"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
)

// TestREADMEDocumentsEverySetting keeps the README's configuration table equal to the flags.
func TestREADMEDocumentsEverySetting(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	var help bytes.Buffer
	fs := config.NewFlagSet("run", &config.Config{}, func(string) string { return "" })
	fs.SetOutput(&help)
	fs.PrintDefaults()
	vars := regexp.MustCompile(`\(\$([A-Z_]+)\)`).FindAllStringSubmatch(help.String(), -1)
	require.NotEmpty(t, vars)
	for _, v := range vars {
		require.Contains(t, string(readme), "`"+v[1]+"`", "README's configuration table lacks %s", v[1])
	}
}
