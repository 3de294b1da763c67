import { describe, expect, it } from "vitest";

import type { TrainerConfig } from "../../src/trainer/config.js";
import { jobEnvironment } from "../../src/trainer/training.js";

describe("jobEnvironment", () => {
  it("drops the variables the trainer reads secrets from and keeps the rest", () => {
    const config = {
      broker: { password: { env: "MQTT_PASSWORD" } },
      review: { token: { env: "REVIEW_TOKEN" } },
      signing: { privateKey: { env: "SIGNING_KEY" } },
    } as unknown as TrainerConfig;
    const env = { MQTT_PASSWORD: "p", REVIEW_TOKEN: "t", SIGNING_KEY: "k", CREDENTIALS_DIRECTORY: "/run/credentials/x", PATH: "/usr/bin", SPARK_MASTER: "local[2]" };

    expect(jobEnvironment(config, env)).toEqual({ PATH: "/usr/bin", SPARK_MASTER: "local[2]" });
    expect(env.MQTT_PASSWORD).toBe("p");
  });

  it("keeps everything when secrets come from files", () => {
    const config = { broker: {}, review: {}, signing: { privateKey: "/etc/sortline/signing.key" } } as unknown as TrainerConfig;

    expect(jobEnvironment(config, { PATH: "/usr/bin" })).toEqual({ PATH: "/usr/bin" });
  });
});
